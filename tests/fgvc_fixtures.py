"""Tiny copies of the published FGVC layouts: real file names and formats, 3 classes, a few small JPEGs.

Each make_<name>(tmp_path) writes the dataset the way its archive unpacks under tmp_path and returns the
dataset folder (its parent works as a root too). EXPECTED_COUNTS / EXPECTED_CLASSES give what a loader
should find. The layouts follow the published archives, not any loader.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

EXPECTED_COUNTS = {
    "cub": {"train": 7, "test": 5},
    "flowers102": {"train": 3, "val": 3, "test": 6},
    "aircraft": {"train": 6, "val": 3, "test": 3},
    "stanford_cars": {"train": 6, "test": 3},
    "stanford_dogs": {"train": 6, "test": 3},
    "nabirds": {"train": 6, "test": 3},
    "imagefolder": {"train": 7, "val": 2},
}
EXPECTED_CLASSES = {"cub": 3, "flowers102": 3, "aircraft": 3, "stanford_cars": 3, "stanford_dogs": 3,
                    "nabirds": 3, "imagefolder": 3}


def jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    """A small real JPEG with seeded pixels."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=85)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def cell(strings: list[str], column: bool = False) -> np.ndarray:
    """A MATLAB cell array of strings (1×N, or N×1 with column=True), as savemat writes object arrays."""
    out = np.empty((len(strings), 1) if column else (1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        out.flat[i] = s
    return out


def make_cub(tmp_path: Path) -> Path:
    """CUB_200_2011.tgz: attributes.txt beside CUB_200_2011/ (as in the archive), ids 1-based."""
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    files = {0: ["Black_Footed_Albatross_0002_55.jpg", "Black_Footed_Albatross_0009_34.jpg",
                 "Black_Footed_Albatross_0046_18.jpg", "Black_Footed_Albatross_0079_796111.jpg"],
             1: ["Laysan_Albatross_0002_1027.jpg", "Laysan_Albatross_0003_1033.jpg",
                 "Laysan_Albatross_0082_524.jpg", "Laysan_Albatross_0104_630.jpg"],
             2: ["Sooty_Albatross_0001_1071.jpg", "Sooty_Albatross_0004_1060.jpg",
                 "Sooty_Albatross_0031_1066.jpg", "Sooty_Albatross_0084_1097.jpg"]}
    is_train = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0]  # 7 train, 5 test
    images, labels, split, boxes = [], [], [], []
    image_id = 0
    for c, names in files.items():
        for name in names:
            image_id += 1
            relative = f"{classes[c]}/{name}"
            # one greyscale image, as CUB has a few
            jpeg(root / "images" / relative, image_id, mode="L" if image_id == 5 else "RGB")
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {is_train[image_id - 1]}")
            boxes.append(f"{image_id} 2.0 3.0 30.0 20.0")
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    write_lines(root / "bounding_boxes.txt", boxes)
    write_lines(root / "attributes" / "certainties.txt", ["1 not visible", "2 guessing"])
    write_lines(root / "README", ["CUB-200-2011 (tiny test copy)"])
    write_lines(tmp_path / "attributes.txt", ["1 has_bill_shape::curved_(up_or_down)"])
    return root


def make_flowers102(tmp_path: Path) -> Path:
    """102flowers.tgz (jpg/) plus imagelabels.mat and setid.mat, as torchvision arranges them."""
    root = tmp_path / "flowers-102"
    labels = [2, 1, 3, 3, 1, 2, 1, 3, 2, 2, 3, 1]  # class of image_00001 .. image_00012, interleaved
    for n in range(1, len(labels) + 1):
        jpeg(root / "jpg" / f"image_{n:05d}.jpg", n, size=(50, 36))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {"trnid": np.array([[2, 1, 3]], dtype=np.uint16),      # one per class
                                 "valid": np.array([[5, 6, 4]], dtype=np.uint16),
                                 "tstid": np.array([[7, 8, 9, 10, 11, 12]], dtype=np.uint16)})
    return root


AIRCRAFT = [  # (image id, variant, family, manufacturer, split)
    ("0034309", "707-320", "Boeing 707", "Boeing", "train"),
    ("0034958", "707-320", "Boeing 707", "Boeing", "train"),
    ("0037511", "707-320", "Boeing 707", "Boeing", "val"),
    ("0037512", "707-320", "Boeing 707", "Boeing", "test"),
    ("0056978", "727-200", "Boeing 727", "Boeing", "train"),
    ("0062765", "727-200", "Boeing 727", "Boeing", "val"),
    ("1025794", "727-200", "Boeing 727", "Boeing", "train"),
    ("1049443", "727-200", "Boeing 727", "Boeing", "test"),
    ("0062766", "Cessna 172", "Cessna 172", "Cessna", "train"),
    ("0063283", "Cessna 172", "Cessna 172", "Cessna", "test"),
    ("1100510", "Cessna 172", "Cessna 172", "Cessna", "val"),
    ("2232419", "Cessna 172", "Cessna 172", "Cessna", "train"),
]


def make_aircraft(tmp_path: Path) -> Path:
    """fgvc-aircraft-2013b.tar.gz: data/ with the per-level, per-split lists and images/<id>.jpg."""
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    for i, (image_id, *_rest) in enumerate(AIRCRAFT):
        jpeg(data / "images" / f"{image_id}.jpg", i, size=(60, 40))
    write_lines(data / "variants.txt", ["707-320", "727-200", "Cessna 172"])
    write_lines(data / "families.txt", ["Boeing 707", "Boeing 727", "Cessna 172"])
    write_lines(data / "manufacturers.txt", ["Boeing", "Cessna"])
    for split in ("train", "val", "test", "trainval"):
        rows = [r for r in AIRCRAFT if r[4] == split or (split == "trainval" and r[4] in ("train", "val"))]
        write_lines(data / f"images_{split}.txt", [r[0] for r in rows])
        for column, level in ((1, "variant"), (2, "family"), (3, "manufacturer")):
            write_lines(data / f"images_{level}_{split}.txt", [f"{r[0]} {r[column]}" for r in rows])
    write_lines(data / "images_box.txt", [f"{r[0]} 3 4 50 30" for r in AIRCRAFT])
    write_lines(root / "README.md", ["FGVC-Aircraft 2013b (tiny test copy)"])
    return root


def car_annotations(rows: list[tuple[str, int]], labelled: bool = True) -> np.ndarray:
    """The 1×N struct array `annotations` of the Stanford Cars devkit .mat files."""
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if labelled else []) + ["fname"]
    out = np.zeros((1, len(rows)), dtype=[(n, object) for n in names])
    for i, (fname, label) in enumerate(rows):
        box = [np.array([[v]], dtype=np.uint16) for v in (2, 3, 35, 25)]
        out[0, i] = tuple(box + ([np.array([[label]], dtype=np.uint8)] if labelled else []) + [fname])
    return out


def make_stanford_cars(tmp_path: Path) -> Path:
    """torchvision's stanford_cars/: devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat."""
    root = tmp_path / "stanford_cars"
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
    train = [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2), ("00004.jpg", 2), ("00005.jpg", 3),
             ("00006.jpg", 1)]
    test = [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3)]
    for i, (name, _) in enumerate(train):
        jpeg(root / "cars_train" / name, 100 + i, size=(48, 32))
    for i, (name, _) in enumerate(test):
        jpeg(root / "cars_test" / name, 200 + i, size=(48, 32))
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(classes)})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": car_annotations(train)})
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": car_annotations(test, labelled=False)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": car_annotations(test)})
    write_lines(root / "devkit" / "README.txt", ["Stanford Cars devkit (tiny test copy)"])
    return root


DOG_BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def dog_list(rows: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """A train_list.mat / test_list.mat: N×1 cells and an N×1 label column."""
    return {"file_list": cell([f for f, _ in rows], column=True),
            "annotation_list": cell([f.removesuffix(".jpg") for f, _ in rows], column=True),
            "labels": np.array([[label] for _, label in rows], dtype=np.float64)}


def make_stanford_dogs(tmp_path: Path) -> Path:
    """Images.tar, Annotation.tar and lists.tar unpacked side by side in stanford_dogs/."""
    root = tmp_path / "stanford_dogs"
    train, test = [], []
    numbers = {0: [10074, 10131, 10621], 1: [10000, 10177, 10184], 2: [10009, 10026, 10029]}
    for k, breed in enumerate(DOG_BREEDS):
        wnid = breed.split("-")[0]
        for j, n in enumerate(numbers[k]):
            relative = f"{breed}/{wnid}_{n}.jpg"
            jpeg(root / "Images" / relative, n, size=(44, 33))
            write_lines(root / "Annotation" / breed / f"{wnid}_{n}", ["<annotation></annotation>"])
            (test if j == 2 else train).append((relative, k + 1))
    savemat(root / "train_list.mat", dog_list(train))
    savemat(root / "test_list.mat", dog_list(test))
    savemat(root / "file_list.mat", dog_list(train + test))
    return root


def nabirds_uuid(n: int) -> str:
    return str(uuid.UUID(int=(0x0000139E21DC4D0CBFE14CAE3C85C829 + n * 7919) % (1 << 128)))


def make_nabirds(tmp_path: Path) -> Path:
    """nabirds.tar.gz: CUB's files keyed by UUID; classes.txt lists the whole hierarchy, so ids are sparse."""
    root = tmp_path / "nabirds"
    write_lines(root / "classes.txt", ["0 Birds", "1 Ducks, Geese, and Swans", "2 Grebes",
                                       "99 Cooper's Hawk (Adult)", "295 Oak Titmouse", "400 Unused Warbler",
                                       "1010 Anna's Hummingbird (Female/juvenile)"])
    write_lines(root / "hierarchy.txt", ["1 0", "2 0", "99 1", "295 2", "400 2", "1010 2"])
    used = [1010, 99, 295]  # images list classes in this order; sorted by id: 99, 295, 1010
    images, labels, split = [], [], []
    n = 0
    for class_id in used:
        for j in range(3):
            n += 1
            u = nabirds_uuid(n)
            relative = f"{class_id:04d}/{u.replace('-', '')}.jpg"
            jpeg(root / "images" / relative, 300 + n, size=(36, 36))
            images.append(f"{u} {relative}")
            labels.append(f"{u} {class_id}")
            split.append(f"{u} {0 if j == 1 else 1}")
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "bounding_boxes.txt", [f"{line.split()[0]} 1 1 30 30" for line in images])
    return root


def make_imagefolder(tmp_path: Path) -> Path:
    """imagenet-style train/<wnid>/*.JPEG and val/<wnid>/*; one class has no val folder."""
    root = tmp_path / "imagenet_subset"
    train = {"n02102040": ["n02102040_1055.JPEG", "n02102040_2033.JPEG"],
             "n01440764": ["n01440764_10026.JPEG", "n01440764_10027.JPEG", "n01440764_10029.png"],
             "n02979186": ["n02979186_1014.JPEG", "n02979186_1032.jpeg"]}
    val = {"n01440764": ["ILSVRC2012_val_00000293.JPEG"], "n02979186": ["ILSVRC2012_val_00000713.JPEG"]}
    for split, classes in (("train", train), ("val", val)):
        for k, (wnid, names) in enumerate(classes.items()):
            for j, name in enumerate(names):
                path = root / split / wnid / name
                if name.endswith(".png"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
                else:
                    jpeg(path, 400 + 10 * k + j)
    write_lines(root / "train" / "n01440764" / "README.txt", ["not an image"])
    (root / "train" / "n02102040" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_lines(root / "LOC_synset_mapping.txt", ["n01440764 tench, Tinca tinca"])
    return root


MAKERS = {"cub": make_cub, "flowers102": make_flowers102, "aircraft": make_aircraft,
          "stanford_cars": make_stanford_cars, "stanford_dogs": make_stanford_dogs, "nabirds": make_nabirds,
          "imagefolder": make_imagefolder}
