"""Features: CNN and ViT extractors (``cnn``, ``vit``) and CLIP's two towers (``clip``)."""
