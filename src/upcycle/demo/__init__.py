"""The demo: its data (BBC News, MiniLM), the fine-tuning recipes of its ingredients and its
figure."""
