"""Models: the layer network, network and model files, input bounds, torch modules to networks."""
