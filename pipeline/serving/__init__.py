"""Prediction on new clips: extractor recipes that travel with a model, media -> features, the prediction."""
