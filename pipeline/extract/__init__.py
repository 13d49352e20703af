"""Stage one: decode frames, embed them with a frozen torchvision backbone, write the feature cache."""
