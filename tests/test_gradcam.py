import struct

import pytest
import torch

from bdguard.analysis.gradcam import GridColumn, changed_pixels, gradcam, gradcam_grid, grid_cells, trigger_focus
from bdguard.data.augment import to_float
from bdguard.errors import BdguardError
from tiny_models import TARGET, backdoored, clean, data, patch_region

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 100) -> torch.Tensor:
    test = data().test
    return test.images[test.labels != TARGET][:n]


def test_maps_have_the_image_size_and_unit_peaks():
    model, _ = backdoored()
    cams = gradcam(model, to_float(_images(40)), batch_size=16)  # batches of 16: the last one is partial
    assert cams.shape == (40, 16, 16)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    peaks = cams.flatten(1).amax(1)
    assert bool(((peaks - 1.0).abs() < 1e-5).all())  # every map here has positive evidence, scaled to 1
    assert not model.training


def test_backdoored_model_looks_at_the_trigger():
    model, attack = backdoored()
    images = _images()
    stamped = attack.apply(images)
    region = changed_pixels(images, stamped)
    assert bool((region <= patch_region()).all())  # the trigger changed nothing outside its patch

    triggered = trigger_focus(gradcam(model, to_float(stamped)), region)
    assert triggered.shape == (len(images),)
    assert float(triggered.nanmean()) > 1.5  # the patch is 1/16 of the image but draws twice its share
    plain = trigger_focus(gradcam(model, to_float(images)), patch_region())
    assert float(plain.nanmean()) < 1.0  # without the trigger the corner draws less than its share
    target_maps = gradcam(model, to_float(images), torch.full((len(images),), TARGET))
    assert not torch.allclose(target_maps, gradcam(model, to_float(images)))  # explicit classes are used


def test_trigger_focus_by_hand():
    cams = torch.zeros(3, 4, 4)
    cams[0] = 1.0  # uniform: no focus
    cams[1, 0, 0] = 1.0  # everything on the region
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True  # a quarter of the image
    ratios = trigger_focus(cams, region)
    assert ratios[0] == pytest.approx(1.0) and ratios[1] == pytest.approx(4.0)
    assert torch.isnan(ratios[2])  # an empty map has no focus
    per_image = torch.zeros(3, 4, 4, dtype=torch.bool)
    assert bool(torch.isnan(trigger_focus(cams, per_image)).all())  # nor does an empty region
    with pytest.raises(BdguardError, match="does not match"):
        trigger_focus(cams, torch.ones(5, 5, dtype=torch.bool))


def test_bad_input_is_refused():
    model, _ = backdoored()
    with pytest.raises(BdguardError, match="float images"):
        gradcam(model, _images(2))
    with pytest.raises(BdguardError, match="one class per image"):
        gradcam(model, to_float(_images(2)), torch.tensor([1]))


def test_grid_has_a_row_per_model_and_a_column_per_input(tmp_path):
    model, attack = backdoored()
    images = _images(50)
    stamped = attack.apply(images)
    region = changed_pixels(images, stamped)
    columns = [
        GridColumn("clean", images, region),
        GridColumn("real trigger", stamped, region),
        GridColumn("no region", images, None),
    ]
    cells = grid_cells([("clean-trained", clean()), ("backdoored", model)], columns)
    assert [[(c.model, c.input) for c in row] for row in cells] == [
        [("clean-trained", "clean"), ("clean-trained", "real trigger"), ("clean-trained", "no region")],
        [("backdoored", "clean"), ("backdoored", "real trigger"), ("backdoored", "no region")],
    ]
    backdoored_triggered = cells[1][1].to_json(TARGET)
    assert backdoored_triggered["predicted_target"] == 1.0 and backdoored_triggered["focus"] > 1.5
    assert cells[0][1].to_json(TARGET)["predicted_target"] < 0.1  # the clean model ignores the patch
    assert cells[0][2].focus is None and cells[0][2].to_json(None)["predicted_target"] is None

    gradcam_grid(cells, columns, tmp_path / "gradcam.png")
    png = (tmp_path / "gradcam.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > height  # three columns, two rows
    assert [p.name for p in tmp_path.iterdir()] == ["gradcam.png"]  # written atomically: no temporary left
