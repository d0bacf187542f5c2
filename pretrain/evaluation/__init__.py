"""What reads a finished run: perplexity, the long-context suite, sampling, and export to Hugging Face."""
