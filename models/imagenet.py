"""ImageNet-1k's class names in the classifiers' output order: what the teachers' logits mean."""


def class_names(num_classes=1000):
    """The names of a teacher's output classes, in its output order: the 1000 ImageNet-1k classes
    (from torchvision's weights metadata, which ships in the wheel: nothing downloads)."""
    if num_classes != 1000:
        return [f"class {i}" for i in range(num_classes)]
    import torchvision
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
