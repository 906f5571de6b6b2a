"""The ingress's route families, one module each, as mixins over ``serve.ingress.IngressCore``."""
