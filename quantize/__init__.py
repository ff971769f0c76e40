"""leukoscope quantize: a trained run becomes a verified int8 model bundle for the device."""
