"""Models: the zoo (building FP models, checkpoint loading), the unit partition, the demo model.

Model names and families live in `conf/model/*.yaml` only; the zoo reads the composed config. May import
`common.data` (the demo's normalisation) and the leaf helpers; never quant, recon, run or a method.
"""
