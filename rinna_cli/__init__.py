"""rinna-cli: chat with rinna's Japanese GPT-NeoX instruction models from a terminal."""

__version__ = "0.1.0"
