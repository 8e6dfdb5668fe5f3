"""Offline converters that turn your images and annotations into webdataset shards for `python -m vlm.train`.

Run them as scripts (`python data_scripts/images_to_shards.py --help`); vlm itself never imports this package.
"""
