"""The certified exact reference."""
