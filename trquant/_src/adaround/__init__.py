"""Post-training quantization by output reconstruction (AdaRound, BRECQ, QDrop)."""
