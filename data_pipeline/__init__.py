"""VideoRefer data: JSON validation, TFRecord conversion, Grain loaders, synthetic data."""
