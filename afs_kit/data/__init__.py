"""Layer 2: data sets as uint8 tensors, image folders, the validation split and batched augmentation."""
from .batches import augment, iterate_batches, to_float, validation_split
from .dataset import Dataset
from .datasets import DATASET_SPECS, default_root, load_dataset

__all__ = ["DATASET_SPECS", "Dataset", "augment", "default_root", "iterate_batches", "load_dataset", "to_float",
           "validation_split"]
