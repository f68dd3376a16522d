"""Image folders, shard sets and arrays as uint8 image collections."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.reader import expand_urls
from trainer.eval.images import class_grid, images_from_array, open_images, to_uint8_images


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, images, labels=None, start=0):
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images):
            members = {"png": _png(img)}
            if labels is not None:
                members["cls"] = str(int(labels[i])).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"sample{start + i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8), np.arange(12) % 3


def test_folder_per_class_gives_labels_and_pixels(tmp_path, digits):
    images, labels = digits
    for i, (img, y) in enumerate(zip(images, labels)):
        (tmp_path / str(y)).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / str(y) / f"{i:03d}.png")
    coll = open_images(tmp_path)
    assert len(coll) == 12 and coll.class_names == ["0", "1", "2"]
    # sorted by class folder, then file name
    order = sorted(range(12), key=lambda i: (labels[i], i))
    np.testing.assert_array_equal(coll.stack()[..., 0], images[order])
    np.testing.assert_array_equal(coll.labels, labels[order])


def test_named_class_folders_map_to_sorted_indices(tmp_path):
    for name in ("zebra", "cat"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "a.png")
    coll = open_images(tmp_path)
    assert coll.class_names == ["cat", "zebra"] and coll.labels.tolist() == [0, 1]
    assert coll[0].shape == (4, 4, 3)


def test_root_images_beside_class_folders_are_not_samples(tmp_path):
    # `dpldm sample` writes OUT/<class>/*.png and a preview OUT/grid.png
    (tmp_path / "0").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "0" / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "grid.png")
    coll = open_images(tmp_path)
    assert len(coll) == 1 and coll.labels.tolist() == [0] and coll.stack().shape == (1, 4, 4, 1)


def test_shards_with_brace_pattern_read_images_and_cls(tmp_path, digits):
    images, labels = digits
    _write_shard(tmp_path / "part-000.tar", images[:7], labels[:7])
    _write_shard(tmp_path / "part-001.tar", images[7:], labels[7:], start=7)
    for pattern in (f"{tmp_path}/part-{{000..001}}.tar", f"{tmp_path}/part-*.tar"):
        coll = open_images(pattern)
        np.testing.assert_array_equal(coll.stack()[..., 0], images)
        np.testing.assert_array_equal(coll.labels, labels)
    assert len(open_images(tmp_path / "part-001.tar")) == 5
    with pytest.raises(FileNotFoundError, match="part-002.tar"):
        expand_urls(f"{tmp_path}/part-{{000..002}}.tar")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_images(f"{tmp_path}/other-*.tar")


def test_max_images_is_a_seeded_subset_across_classes(tmp_path, digits):
    images, labels = digits
    _write_shard(tmp_path / "s.tar", images, labels)
    a, b = open_images(tmp_path / "s.tar", max_images=6), open_images(tmp_path / "s.tar", max_images=6)
    assert len(a) == 6 and a.labels.tolist() == b.labels.tolist()
    assert len(set(a.labels.tolist())) > 1


def test_to_uint8_images_layouts_and_value_range():
    t = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    out = to_uint8_images(t, value_range=(-1, 1))
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert to_uint8_images(np.zeros((3, 8, 8), np.uint8)).shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="value_range"):
        to_uint8_images(t)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_images(np.zeros((2, 8, 8, 4), np.uint8))


def test_class_grid_has_one_row_per_class():
    x = np.stack([np.full((4, 4), 10 * (i + 1), np.uint8) for i in range(6)])
    coll = images_from_array(x, labels=[0, 1, 0, 1, 2, 0])
    grid = class_grid(coll, per_class=2)
    assert grid.shape == (3 * 6 + 2, 2 * 6 + 2, 1)
    assert grid[2, 2, 0] == 10 and grid[2, 8, 0] == 30  # class 0: images 0 and 2
    assert grid[14, 2, 0] == 50 and grid[14, 8, 0] == 0  # class 2 has one image


def test_a_broken_label_or_image_in_a_shard_is_named_not_quoted(tmp_path):
    """The reference set may be private: a label that is not a number and an image that does not decode
    are refused naming the shard and the sample, never their content (PIL's messages can quote pixels)."""
    from trainer.data.shards import write_shard
    from trainer.eval.images import ImageSetError
    write_shard(tmp_path / "label.tar", [{"__key__": "k1", "png": b"x", "cls": b"secret7"}])
    with pytest.raises(ImageSetError, match=r"label.tar: k1.cls is not an integer label") as refused:
        open_images(str(tmp_path / "label.tar"))
    assert "secret" not in str(refused.value)
    write_shard(tmp_path / "pixels.tar", [{"__key__": "k2", "pgm": b"P2\n2 2\n255\n7310 0 0 0\n"}])
    with pytest.raises(ImageSetError, match=r"cannot decode image \(ValueError\)") as refused:
        open_images(str(tmp_path / "pixels.tar"))[0]
    assert "7310" not in str(refused.value)
