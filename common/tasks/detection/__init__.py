"""COCO instance detection (`task=detection`, docs/detection.md): Swin Mask R-CNN / Cascade Mask R-CNN rebuilt on
torchvision's detection parts + timm's Swin with mmdet 2.11's conventions (`model`), the STOD checkpoint key map
(`convert`), COCO / demo data (`data`), COCOeval metrics (`metrics`), the detector of a model config (`zoo`), the head fill-in (`quant`),
APHQ's detection units / RPN perturbation loss (`recon`) and the demo trainer (`train_demo`). The runner is `common.run.detection`."""
