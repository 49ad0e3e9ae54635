"""Shared machinery of the ViT PTQ framework: model zoo, data, fake-quant core, calibration,
evaluation, stage caching and tracking. Method packages (`aphq`, `erq`) build on it."""
