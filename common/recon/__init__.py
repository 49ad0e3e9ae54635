"""Reconstruction engine: AdaRound weights and learned activation scales, trained unit by unit.

Every reconstruction method (BRECQ, QDrop, APHQ, ...) drives `reconstruct_model` with its own loss
weights. May import `common.quant`, `common.calib`, `common.models` and the leaf helpers; never the
experiment layer (`common.run`) or a method.
"""
