"""Looking inside trained models: per-channel activation norms of the last feature map (activation_norms.py),
Grad-CAM (gradcam.py) and the `bdguard analyze` run that draws both (analyze.py)."""
