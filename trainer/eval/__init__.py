"""Evaluation of generated images: FID, precision/recall, downstream classifier accuracy.

- :mod:`trainer.eval.images`: image folders, shard sets and arrays as uint8 image collections.
- :mod:`trainer.eval.fid`: TF-Inception features (cached for reference sets) and the Frechet distance.
- :mod:`trainer.eval.precision_recall`: k-NN manifold precision and recall in feature space.
- :mod:`trainer.eval.downstream`: train on synthetic, test on real.
"""
from trainer.eval.downstream import downstream_accuracy
from trainer.eval.fid import InceptionFeatures, fid, fid_from_features, feature_statistics, frechet_distance
from trainer.eval.images import ImageCollection, images_from_array, open_images, to_uint8_images
from trainer.eval.precision_recall import precision_recall

__all__ = [
    "ImageCollection", "InceptionFeatures", "downstream_accuracy", "feature_statistics", "fid",
    "fid_from_features", "frechet_distance", "images_from_array", "open_images", "precision_recall",
    "to_uint8_images",
]
