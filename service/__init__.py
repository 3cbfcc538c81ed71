"""The BentoML service: HTTP concerns only; tensor work lives in model/."""
