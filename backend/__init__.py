"""toothseg serving side: the Label Studio ML backend and its inference pipeline."""
