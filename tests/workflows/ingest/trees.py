"""Builders for small source trees in every layout. Image ``i`` is a flat colour encoding ``i``;
its mask has exactly ``mask_pixels(i)`` anomalous pixels, so a test can check that each mask sits on
its own image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (16, 12)  # width, height


def image_bytes(index: int, size: tuple[int, int] = SIZE, mode: str = "RGB") -> bytes:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[..., 0] = index % 256
    array[..., 1] = index // 256
    array[..., 2] = 200
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def mask_pixels(index: int) -> int:
    return index % 150 + 1


def mask_bytes(index: int, size: tuple[int, int] = SIZE) -> bytes:
    flat = np.zeros(size[0] * size[1], np.uint8)
    flat[: mask_pixels(index)] = 255
    buffer = io.BytesIO()
    Image.fromarray(flat.reshape(size[1], size[0])).save(buffer, "PNG")
    return buffer.getvalue()


def index_of(image: bytes) -> int:
    pixel = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[0, 0]
    return int(pixel[0]) + 256 * int(pixel[1])


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def next(self) -> int:
        self.value += 1
        return self.value


def build_defect_tree(root: Path, *, normal: str = "good", anomalous: tuple[str, ...] = ("crack", "scratch"),
                      categories: tuple[str, ...] = ("bottle", "wood"), mask_suffix: str = "_mask",
                      counter: Counter | None = None) -> dict:
    """MVTec AD / MPDD (normal='good') or BTAD (normal='ok', anomalous=('ko',), mask_suffix='')."""
    counter = counter or Counter()
    expected = {}
    for category in categories:
        for n in range(3):
            put(root / category / "train" / normal / f"{n:03d}.png", image_bytes(counter.next()))
        for n in range(2):
            put(root / category / "test" / normal / f"{n:03d}.png", image_bytes(counter.next()))
        for defect in anomalous:
            for n in range(2):
                index = counter.next()
                put(root / category / "test" / defect / f"{n:03d}.png", image_bytes(index))
                gt_dir = root / category / "ground_truth" / defect
                put(gt_dir / f"{n:03d}{mask_suffix}.png", mask_bytes(index))
        expected[category] = {"train": 3, "test_normal": 2, "test_anomalous": 2 * len(anomalous)}
    return expected


def build_folder_tree(root: Path, counter: Counter | None = None, *, same_names: bool = False) -> None:
    """``same_names``: every folder uses the file names 0.png, 1.png (masks must still pair with the
    anomalous images only)."""
    counter = counter or Counter(500)
    for category in ("tile", "leather"):
        for n in range(2):
            folders = ("train", "normal", "anomalous", "unl")
            names = {k: (f"{n}" if same_names else f"{k[0]}{n}") for k in folders}
            put(root / category / "train" / f"{names['train']}.png", image_bytes(counter.next()))
            put(root / category / "normal" / f"{names['normal']}.png", image_bytes(counter.next()))
            index = counter.next()
            put(root / category / "anomalous" / f"{names['anomalous']}.png", image_bytes(index))
            put(root / category / "masks" / f"{names['anomalous']}_mask.png", mask_bytes(index))
            put(root / category / "unlabeled" / f"{names['unl']}.png", image_bytes(counter.next()))


def build_typed_folder_tree(root: Path, counter: Counter | None = None) -> dict[str, str]:
    """The folder layout with defect types: ``anomalous/<type>/`` with masks in ``masks/<type>/`` (the
    same stems in both types), one typed image whose mask is in the flat ``masks/``, one untyped image
    directly in ``anomalous/``, and a stray ``masks/<type>/`` folder. Returns source path -> defect type
    of the anomalous images."""
    counter = counter or Counter(900)
    cat = root / "tile"
    put(cat / "train" / "0.png", image_bytes(counter.next()))
    put(cat / "normal" / "0.png", image_bytes(counter.next()))  # same stem as typed anomalies: no mask
    expected = {}
    for defect, suffix in (("crack", "_mask"), ("hole", "")):
        for n in range(2):
            index = counter.next()
            put(cat / "anomalous" / defect / f"{n}.png", image_bytes(index))
            put(cat / "masks" / defect / f"{n}{suffix}.png", mask_bytes(index))
            expected[f"tile/anomalous/{defect}/{n}.png"] = defect
    index = counter.next()
    put(cat / "anomalous" / "hole" / "7.png", image_bytes(index))
    put(cat / "masks" / "7_mask.png", mask_bytes(index))  # a typed image, its mask in the flat folder
    expected["tile/anomalous/hole/7.png"] = "hole"
    index = counter.next()
    put(cat / "anomalous" / "flat.png", image_bytes(index))
    put(cat / "masks" / "flat_mask.png", mask_bytes(index))
    expected["tile/anomalous/flat.png"] = "anomalous"
    put(cat / "masks" / "stray" / "0.png", mask_bytes(0))
    return expected


def build_visa_tree(root: Path, counter: Counter | None = None) -> None:
    counter = counter or Counter(800)
    lines = ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        for n in range(3):
            rel = f"{category}/Data/Images/Normal/{n:03d}.png"
            put(root / rel, image_bytes(counter.next()))
            lines.append(f"{category},{'train' if n < 2 else 'test'},normal,{rel},")
        for n in range(2):
            index = counter.next()
            rel = f"{category}/Data/Images/Anomaly/{n:03d}.png"
            mask_rel = f"{category}/Data/Masks/Anomaly/{n:03d}.png"
            put(root / rel, image_bytes(index))
            put(root / mask_rel, mask_bytes(index))
            lines.append(f"{category},test,anomaly,{rel},{mask_rel}")
    put(root / "split_csv" / "1cls.csv", ("\n".join(lines) + "\n").encode())
