"""Datasets: COCO panoptic format (also used by the synthetic shapes set), ADE20K, and augmentations."""
