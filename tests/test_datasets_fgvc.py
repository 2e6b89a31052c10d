"""FGVC loaders on tiny copies of the published layouts (tests/fgvc_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from fgvc_fixtures import (EXPECTED_CLASSES, EXPECTED_COUNTS, MAKERS, car_annotations, dog_list, jpeg, make_aircraft,
                           make_cub, make_flowers102, make_imagefolder, make_nabirds, make_stanford_cars,
                           make_stanford_dogs, write_lines)
from trials.datasets import REGISTRY, DatasetError, load_dataset
from trials.datasets.preprocess import iter_batches

NAMES = list(MAKERS)


def one_line_error(name, root, **options) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root, **options)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}:"), message
    return message


# ---- every layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_counts_classes_labels(name, tmp_path):
    data = load_dataset(name, MAKERS[name](tmp_path))
    assert data.name == name
    assert data.counts() == EXPECTED_COUNTS[name]
    assert data.num_classes == EXPECTED_CLASSES[name]
    assert all(isinstance(c, str) and c for c in data.classes)
    ids = [s.image_id for split in data.splits.values() for s in split]
    assert len(set(ids)) == len(ids)  # stable ids are unique across splits
    for split in data.splits.values():
        for s in split:
            assert 0 <= s.label < data.num_classes and isinstance(s.label, int)
            assert s.source.is_file() and str(s.source).startswith(str(tmp_path.resolve()))
    train_labels = {s.label for s in data.splits["train"]}
    assert train_labels == set(range(data.num_classes))


@pytest.mark.parametrize("name", NAMES)
def test_root_or_parent(name, tmp_path):
    root = MAKERS[name](tmp_path)
    direct, parent = load_dataset(name, root), load_dataset(name, root.parent)
    assert parent.classes == direct.classes
    assert parent.splits == direct.splits


@pytest.mark.parametrize("name", NAMES)
def test_missing_root(name, tmp_path):
    message = one_line_error(name, tmp_path / "absent")
    assert "absent" in message and "does not exist" in message
    assert "root" in one_line_error(name, None)


MISSING_FILES = [
    ("cub", "images.txt"), ("cub", "image_class_labels.txt"), ("cub", "train_test_split.txt"), ("cub", "classes.txt"),
    ("flowers102", "imagelabels.mat"), ("flowers102", "setid.mat"),
    ("aircraft", "data/variants.txt"), ("aircraft", "data/images_variant_val.txt"),
    ("stanford_cars", "devkit/cars_meta.mat"), ("stanford_cars", "devkit/cars_train_annos.mat"),
    ("stanford_cars", "cars_test_annos_withlabels.mat"),
    ("stanford_dogs", "train_list.mat"), ("stanford_dogs", "test_list.mat"),
    ("nabirds", "images.txt"), ("nabirds", "image_class_labels.txt"), ("nabirds", "train_test_split.txt"),
    ("nabirds", "classes.txt"),
    ("imagefolder", "val"),
]


@pytest.mark.parametrize("name,file", MISSING_FILES)
def test_missing_annotation_file(name, file, tmp_path):
    root = MAKERS[name](tmp_path)
    path = root / file
    if path.is_dir():
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        path.rmdir()
    else:
        path.unlink()
    message = one_line_error(name, root)
    assert str(path) in message


# the annotation file that lists the first train image
LISTS = {"cub": "images.txt", "flowers102": "setid.mat", "aircraft": "data/images_variant_train.txt",
         "stanford_cars": "devkit/cars_train_annos.mat", "stanford_dogs": "train_list.mat", "nabirds": "images.txt"}


@pytest.mark.parametrize("name", list(LISTS))
def test_annotation_names_missing_image(name, tmp_path):
    root = MAKERS[name](tmp_path)
    victim = load_dataset(name, root).splits["train"][0]
    victim.source.unlink()
    message = one_line_error(name, root)
    assert str(root / LISTS[name]) in message and "not at" in message and victim.source.name in message


def escape_cub_like(root):  # CUB and NABirds: a path under images/ that climbs out of the root
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " ../../outside.jpg"
    write_lines(root / "images.txt", lines)


def escape_aircraft(root):
    path = root / "data" / "images_variant_train.txt"
    lines = path.read_text().splitlines()
    lines[0] = "../../../outside " + lines[0].split(maxsplit=1)[1]
    write_lines(path, lines)


def escape_cars(root):
    savemat(root / "devkit" / "cars_train_annos.mat",
            {"annotations": car_annotations([("00001.jpg", 1), ("../../outside.jpg", 2), ("00003.jpg", 3)])})


def escape_dogs(root):
    savemat(root / "train_list.mat", dog_list([("n02085620-Chihuahua/n02085620_10074.jpg", 1),
                                               ("n02085782-Japanese_spaniel/n02085782_10000.jpg", 2),
                                               ("n02085936-Maltese_dog/n02085936_10009.jpg", 3),
                                               ("../../outside.jpg", 4)]))


ESCAPES = {"cub": escape_cub_like, "nabirds": escape_cub_like, "aircraft": escape_aircraft,
           "stanford_cars": escape_cars, "stanford_dogs": escape_dogs}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_path_escaping_root(name, tmp_path):
    root = MAKERS[name](tmp_path)
    jpeg(tmp_path / "outside.jpg", 0)  # exists, so only the escape check can refuse it
    ESCAPES[name](root)
    message = one_line_error(name, root)
    assert "outside the dataset root" in message and str(root / LISTS[name]) in message


def test_every_registered_fgvc_loader_is_covered():
    assert set(NAMES) <= set(REGISTRY)


# ---- per-dataset details ------------------------------------------------------------------------------

def test_cub_labels_and_names(tmp_path):
    data = load_dataset("cub", make_cub(tmp_path))
    assert data.classes == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    for s in data.splits["train"] + data.splits["test"]:
        assert s.image_id.startswith(f"{s.label + 1:03d}.") and s.source.name == s.image_id.split("/")[1]


def test_cub_bad_label_and_split_flag(tmp_path):
    root = make_cub(tmp_path)
    write_lines(root / "image_class_labels.txt", ["1 7"] + [f"{i} 1" for i in range(2, 13)])
    message = one_line_error("cub", root)
    assert "image_class_labels.txt" in message and "'7'" in message
    make_cub(tmp_path / "again")
    root = tmp_path / "again" / "CUB_200_2011"
    write_lines(root / "train_test_split.txt", ["1 yes"] + [f"{i} 1" for i in range(2, 13)])
    assert "train_test_split.txt" in one_line_error("cub", root)


def test_nabirds_sparse_class_ids(tmp_path):
    data = load_dataset("nabirds", make_nabirds(tmp_path))
    # ids 99, 295, 1010 in numeric order; 0, 1, 2 and 400 in classes.txt are not used by any image
    assert data.classes == ["Cooper's Hawk (Adult)", "Oak Titmouse", "Anna's Hummingbird (Female/juvenile)"]
    folder_to_label = {"0099": 0, "0295": 1, "1010": 2}
    for s in data.splits["train"] + data.splits["test"]:
        assert folder_to_label[s.source.parent.name] == s.label
        assert len(s.image_id) == 36 and s.image_id.count("-") == 4  # the UUID


def test_parent_holding_cub_and_nabirds(tmp_path):
    make_cub(tmp_path)
    make_nabirds(tmp_path)
    assert load_dataset("cub", tmp_path).counts() == EXPECTED_COUNTS["cub"]
    assert load_dataset("nabirds", tmp_path).counts() == EXPECTED_COUNTS["nabirds"]


def test_aircraft_levels(tmp_path):
    root = make_aircraft(tmp_path)
    variant = load_dataset("aircraft", root)
    family = load_dataset("aircraft", root, level="family")
    maker = load_dataset("aircraft", root.parent, level="manufacturer")
    assert family.classes == ["Boeing 707", "Boeing 727", "Cessna 172"]
    assert maker.classes == ["Boeing", "Cessna"]
    for split in ("train", "val", "test"):
        assert [s.image_id for s in family.splits[split]] == [s.image_id for s in variant.splits[split]]
        for v, m in zip(variant.splits[split], maker.splits[split]):
            assert maker.classes[m.label] == ("Cessna" if variant.classes[v.label] == "Cessna 172" else "Boeing")
    assert variant.splits["train"][0].image_id == "0034309"  # leading zeros kept
    message = one_line_error("aircraft", root, level="model")
    assert "level" in message and "'model'" in message


def test_aircraft_unknown_class_name(tmp_path):
    root = make_aircraft(tmp_path)
    write_lines(root / "data" / "images_variant_test.txt", ["0037512 747-400"])
    message = one_line_error("aircraft", root)
    assert "images_variant_test.txt" in message and "747-400" in message


def test_flowers_labels_and_one_image_split(tmp_path):
    root = make_flowers102(tmp_path)
    data = load_dataset("flowers102", root)
    assert [(s.image_id, s.label) for s in data.splits["train"]] == [("image_00002", 0), ("image_00001", 1),
                                                                      ("image_00003", 2)]
    # a 1-element split must stay a list (squeeze_me would turn it into a scalar)
    savemat(root / "setid.mat", {"trnid": np.array([[2, 1, 3]], dtype=np.uint16),
                                 "valid": np.array([[5]], dtype=np.uint16),
                                 "tstid": np.array([[7, 8]], dtype=np.uint16)})
    assert load_dataset("flowers102", root).counts() == {"train": 3, "val": 1, "test": 2}
    savemat(root / "setid.mat", {"trnid": np.array([[2, 99]], dtype=np.uint16),
                                 "valid": np.array([[5]], dtype=np.uint16),
                                 "tstid": np.array([[7]], dtype=np.uint16)})
    message = one_line_error("flowers102", root)
    assert "setid.mat" in message and "99" in message
    savemat(root / "setid.mat", {"trnid": np.array([[2]], dtype=np.uint16)})
    assert "'valid'" in one_line_error("flowers102", root)
    (root / "imagelabels.mat").write_bytes(b"not a mat file")
    assert "imagelabels.mat" in one_line_error("flowers102", root)


def test_stanford_cars_details(tmp_path):
    root = make_stanford_cars(tmp_path)
    data = load_dataset("stanford_cars", root)
    assert data.classes[2] == "Ram C/V Cargo Van Minivan 2012"
    assert [(s.image_id, s.label) for s in data.splits["test"]] == [("cars_test/00001.jpg", 1),
                                                                     ("cars_test/00002.jpg", 0),
                                                                     ("cars_test/00003.jpg", 2)]
    # the devkit's unlabelled test annotations are not enough
    (root / "devkit" / "cars_test_annos.mat").replace(root / "cars_test_annos_withlabels.mat")
    message = one_line_error("stanford_cars", root)
    assert "cars_test_annos_withlabels.mat" in message and "'class'" in message
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": car_annotations([("00001.jpg", 4)])})
    assert "class 4" in one_line_error("stanford_cars", root)


def test_stanford_dogs_details(tmp_path):
    root = make_stanford_dogs(tmp_path)
    data = load_dataset("stanford_dogs", root)
    assert data.classes == ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]
    assert all(data.classes[s.label] in s.image_id for s in data.splits["test"])
    savemat(root / "test_list.mat", dog_list([("n02085620-Chihuahua/n02085620_10621.jpg", 2)]))
    message = one_line_error("stanford_dogs", root)
    assert "test_list.mat" in message and "label 2" in message


def test_imagefolder_details(tmp_path):
    root = make_imagefolder(tmp_path)
    data = load_dataset("imagefolder", root)
    assert data.classes == ["n01440764", "n02102040", "n02979186"]  # sorted train folders
    assert [s.image_id for s in data.splits["val"]] == ["val/n01440764/ILSVRC2012_val_00000293.JPEG",
                                                        "val/n02979186/ILSVRC2012_val_00000713.JPEG"]
    assert [s.label for s in data.splits["val"]] == [0, 2]
    jpeg(root / "val" / "n09999999" / "x.JPEG", 1)
    message = one_line_error("imagefolder", root)
    assert "n09999999" in message and "train" in message
    (root / "val" / "n09999999" / "x.JPEG").unlink()
    (root / "val" / "n09999999").rmdir()
    jpeg(root / "train" / "loose.jpg", 2)
    assert "loose.jpg" in one_line_error("imagefolder", root)


# ---- decoding -----------------------------------------------------------------------------------------

def test_iter_batches_on_fixture(tmp_path):
    samples = load_dataset("cub", make_cub(tmp_path)).splits["train"]  # includes a greyscale JPEG
    batches = list(iter_batches(samples, size=32, channels=3, batch_size=3, workers=2))
    assert [len(b) for _, b in batches] == [3, 3, 1]
    assert [s for _, b in batches for s in b] == samples  # order kept
    for array, chunk in batches:
        assert array.shape == (len(chunk), 3, 32, 32) and array.dtype == np.float32
        assert array.min() >= -1.0 and array.max() <= 1.0


def test_corrupt_image_raises_or_is_skipped(tmp_path):
    samples = load_dataset("stanford_dogs", make_stanford_dogs(tmp_path)).splits["train"]
    samples[1].source.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    with pytest.raises(DatasetError) as info:
        list(iter_batches(samples, size=16, channels=3, batch_size=4, workers=2))
    assert samples[1].source.name in str(info.value) and "\n" not in str(info.value)
    kept = [s for _, chunk in iter_batches(samples, 16, 3, 4, workers=2, skip_corrupt=True) for s in chunk]
    assert kept == samples[:1] + samples[2:]
