//! Hugging Face Hub client: downloads into the standard Hub cache
