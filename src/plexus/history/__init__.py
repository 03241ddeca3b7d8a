"""History stores: each channel's offset counter, epoch and recent messages."""
