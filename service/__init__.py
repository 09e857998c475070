"""The segmentation service and the `maskformer` command line."""
