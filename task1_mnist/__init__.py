"""Task 1: knowledge distillation on MNIST (teacher CNN -> student MLP)."""
