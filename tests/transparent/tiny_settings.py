"""Settings of train_tiny.py MODE=modglobals kept in a module of the script's own, which the loop changes as it
trains (``import tiny_settings``): a scale decayed after each step and a log of the losses."""
SCALE = 1.0
LOG = []
