"""The Flax module tree: vision tower, connector, object encoder, decoder, composite model."""
