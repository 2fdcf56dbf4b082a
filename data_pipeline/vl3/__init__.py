"""VRVL3 (VideoRefer-VideoLLaMA3) host-side processing: resize and patches, frame sampling, token pruning."""
