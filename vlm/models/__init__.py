"""Plain torch modules: vision tower, text tower, CLIP model, projector and the vision-language model."""
