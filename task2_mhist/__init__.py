"""Task 2: knowledge distillation on MHIST histopathology (ResNet50V2 -> MobileNetV2)."""
