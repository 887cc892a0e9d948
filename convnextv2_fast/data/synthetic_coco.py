"""Synthetic COCO-format instance-segmentation data (no download needed).

Writes a directory laid out like COCO 2017 so that mmdet's stock
``coco_instance.py`` dataset config only needs ``data_root`` changed::

    root/annotations/instances_train2017.json   root/train2017/*.jpg
    root/annotations/instances_val2017.json     root/val2017/*.jpg

Each image has a textured background and several filled polygons (random
convex polygons, some overlapping), each annotated with its polygon
``segmentation``, ``bbox`` (x, y, w, h), shoelace ``area`` and a category from
COCO's 80 class names, so mmdet's ``CocoDataset`` maps them to labels.
The files load with pycocotools and pass mmdet's LSJ pipeline.

CLI: ``python -m convnextv2_fast.data.synthetic_coco --out data/synthetic_coco
--train 8 --val 2 --size 640 480``.
"""
import argparse
import json
import math
import os
from typing import Sequence, Tuple

import numpy as np

from .._errors import ArgumentError

COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag',
    'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
    'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
    'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush')


def _polygon(rng, width, height):
    """A random convex-ish polygon (list of (x, y)) inside the image."""
    scale = min(width, height)
    radius = rng.uniform(0.06, 0.3) * scale
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    n = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, height - 1)
    return list(zip(xs.tolist(), ys.tolist()))


def _area(points):
    xs, ys = np.array(points).T
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) -
                           np.dot(ys, np.roll(xs, 1))))


def _write_split(root, split, num_images, size_range, instances, rng,
                 num_classes):
    from PIL import Image, ImageDraw

    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for img_id in range(1, num_images + 1):
        width = int(rng.integers(size_range[0][0], size_range[0][1] + 1))
        height = int(rng.integers(size_range[1][0], size_range[1][1] + 1))
        base = rng.integers(0, 255, size=3)
        noise = rng.normal(0, 20, size=(height // 8 + 1, width // 8 + 1, 3))
        bg = np.clip(base + np.kron(noise, np.ones((8, 8, 1)))[:height, :width],
                     0, 255).astype(np.uint8)
        image = Image.fromarray(bg)
        draw = ImageDraw.Draw(image)
        count = int(rng.integers(instances[0], instances[1] + 1))
        for _ in range(count):
            poly = _polygon(rng, width, height)
            area = _area(poly)
            if area < 16:
                continue
            color = tuple(int(c) for c in rng.integers(0, 255, size=3))
            draw.polygon(poly, fill=color)
            xs, ys = zip(*poly)
            x0, y0 = min(xs), min(ys)
            annotations.append(
                dict(id=ann_id, image_id=img_id,
                     category_id=int(rng.integers(1, num_classes + 1)),
                     segmentation=[[round(v, 2) for p in poly for v in p]],
                     area=round(area, 2),
                     bbox=[round(x0, 2), round(y0, 2),
                           round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                     iscrowd=0))
            ann_id += 1
        file_name = f'{img_id:012d}.jpg'
        image.save(os.path.join(img_dir, file_name), quality=90)
        images.append(dict(id=img_id, file_name=file_name, width=width,
                           height=height))
    categories = [dict(id=i + 1, name=COCO_CLASSES[i], supercategory='thing')
                  for i in range(len(COCO_CLASSES))]
    ann_file = os.path.join(root, 'annotations', f'instances_{split}.json')
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    with open(ann_file, 'w') as f:
        json.dump(dict(info=dict(description='convnextv2_fast synthetic COCO'),
                       licenses=[], images=images, annotations=annotations,
                       categories=categories), f)
    return ann_file


def make_synthetic_coco(root: str,
                        num_train: int = 8,
                        num_val: int = 2,
                        size: Tuple[int, int] = (640, 480),
                        size_jitter: float = 0.25,
                        instances: Sequence[int] = (3, 8),
                        num_classes: int = 10,
                        seed: int = 0) -> dict:
    """Write a synthetic COCO-style dataset under ``root``; return its paths.

    Args:
        size: (width, height) of the images; each image's sides vary by
            ``±size_jitter`` (realistic COCO-like aspect spread).
        instances: (min, max) polygons per image.
        num_classes: categories used (the first ``num_classes`` COCO names; all
            80 are declared so mmdet's CocoDataset maps ids as for COCO).
    """
    if num_train < 1 or num_val < 0:
        raise ArgumentError(
            f'num_train must be >= 1 and num_val >= 0, got {num_train}, '
            f'{num_val}.')
    if len(size) != 2 or min(size) < 32:
        raise ArgumentError(f'size must be (width, height) >= 32, got {size}.')
    if not 1 <= num_classes <= len(COCO_CLASSES):
        raise ArgumentError(f'num_classes must be in [1, 80], got {num_classes}.')
    if len(instances) != 2 or not 1 <= instances[0] <= instances[1]:
        raise ArgumentError(f'instances must be (min, max) >= 1, got {instances}.')
    rng = np.random.default_rng(seed)
    size_range = [(max(32, int(s * (1 - size_jitter))), int(s * (1 + size_jitter)))
                  for s in size]
    out = dict(root=root)
    for split, n in (('train2017', num_train), ('val2017', num_val)):
        if n:
            out[split] = _write_split(root, split, n, size_range, instances,
                                      rng, num_classes)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/synthetic_coco')
    parser.add_argument('--train', type=int, default=8)
    parser.add_argument('--val', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(640, 480),
                        metavar=('W', 'H'))
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_synthetic_coco(args.out, args.train, args.val,
                                tuple(args.size), seed=args.seed)
    print(json.dumps(paths, indent=2))


if __name__ == '__main__':
    main()
