"""The runs behind the commands, one module each (train and evaluate, poison, repair, analyze, detect), on the
set-up they share (`common.py`). The CLI, the bench and the Python API call the same functions."""
