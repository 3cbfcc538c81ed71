"""Where requests become tensors and answers: admission, decoding, batching, the backends (the model in
this process, or the split layout's model service) and the attribution and feature-map work."""
