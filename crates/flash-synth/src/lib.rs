//! Synthetic Hugging Face checkpoints with the real shapes of Qwen3 and Llama 3
