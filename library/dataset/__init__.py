"""Datasets: image discovery, captions, buckets, transforms, batching and caches."""
