"""peft's custom-model test battery with FISH-DIP cases (see README.md)."""
