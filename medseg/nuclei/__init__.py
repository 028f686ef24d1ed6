"""Nuclei instance segmentation in H&E tiles: HoVer targets, post-processing, prediction and outputs."""
