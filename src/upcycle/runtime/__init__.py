"""Where and how things run: devices and precision, torch.distributed, memory measurement."""
