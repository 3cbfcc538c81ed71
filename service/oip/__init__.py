"""The Open Inference Protocol (KServe v2): its app, the tensor codec, inference and its OpenAPI spec."""
