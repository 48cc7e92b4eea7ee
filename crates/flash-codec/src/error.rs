//! Errors. They say what is wrong with a chunk; the caller adds the model,
//! tensor and chunk names.

use thiserror::Error;

/// Why a stored chunk cannot be decoded (or validated).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The decoded length is not a whole number of elements.
    #[error("a decoded length of {len} bytes is not a whole number of {elem_bytes}-byte elements")]
    PartialElement {
        /// Decoded length in bytes.
        len: usize,
        /// Bytes per element of the layout.
        elem_bytes: usize,
    },
    /// A chunk has more elements than the format allows (2^32 - 1).
    #[error("{elems} elements in one chunk (at most 2^32 - 1)")]
    TooManyElements {
        /// Elements of the chunk.
        elems: usize,
    },
    /// A `Raw` chunk whose stored length differs from its decoded length.
    #[error("a raw chunk of {stored} stored bytes for {decoded} decoded bytes")]
    RawLength {
        /// Stored bytes given.
        stored: usize,
        /// Decoded bytes expected.
        decoded: usize,
    },
    /// Shorter than the header and lane states.
    #[error("{stored} stored bytes: shorter than the 136 bytes of header and lane states")]
    Truncated {
        /// Stored bytes given.
        stored: usize,
    },
    /// The symbol count is outside 1..=256.
    #[error("bad header: {symbols} symbols in the table (1 to 256)")]
    SymbolCount {
        /// The header's symbol count.
        symbols: usize,
    },
    /// The reserved header field is not zero.
    #[error("bad header: reserved field is {value:#06x}, not 0")]
    Reserved {
        /// The field's value.
        value: u16,
    },
    /// The stored length is not the one the header and element count imply.
    #[error("{stored} stored bytes, but {elems} elements with this header take {expected}")]
    StoredLength {
        /// Stored bytes given.
        stored: usize,
        /// Elements of the chunk.
        elems: usize,
        /// Length implied by layout, element count and header.
        expected: usize,
    },
    /// A lane's initial state is below `L`.
    #[error("bad header: lane {lane} starts in state {state:#x}, below 2^16")]
    InitialState {
        /// Lane index.
        lane: usize,
        /// Its stored state.
        state: u32,
    },
    /// A frequency of zero in the table.
    #[error("bad table: frequency {index} is zero")]
    ZeroFrequency {
        /// Index in the table.
        index: usize,
    },
    /// The table's symbols are not strictly increasing.
    #[error("bad table: symbol {index} ({symbol}) does not follow {previous}")]
    SymbolOrder {
        /// Index in the table.
        index: usize,
        /// The symbol there.
        symbol: u8,
        /// The symbol before it.
        previous: u8,
    },
    /// The table's frequencies do not sum to `2^PROB_BITS`.
    #[error("bad table: frequencies sum to {sum}, not {expected}")]
    FrequencySum {
        /// Their sum.
        sum: u32,
        /// `2^PROB_BITS`.
        expected: u32,
    },
    /// A padding byte is not zero.
    #[error("padding byte at offset {offset} is not zero")]
    Padding {
        /// Offset in the stored chunk.
        offset: usize,
    },
    /// The decoder needed more words than the stream holds.
    #[error("the coded stream ends early (step {step} needs words past its {words} words)")]
    StreamOverrun {
        /// Decoding step (32 elements each).
        step: usize,
        /// Words in the stream.
        words: usize,
    },
    /// A lane's state after the last element is not `L`.
    #[error("lane {lane} ends in state {state:#x}, not 0x10000")]
    FinalState {
        /// Lane index.
        lane: usize,
        /// Its final state.
        state: u32,
    },
    /// The decoder consumed fewer words than the stream holds.
    #[error("the coded stream has {words} words but decoding took {consumed}")]
    WordsLeft {
        /// Words consumed.
        consumed: usize,
        /// Words in the stream.
        words: usize,
    },
}

/// Why a tensor cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TensorError {
    /// `chunk_elems` is zero.
    #[error("chunk_elems is 0")]
    ZeroChunkElems,
    /// The decoded length is not a whole number of elements.
    #[error("a decoded length of {len} bytes is not a whole number of {elem_bytes}-byte elements")]
    PartialElement {
        /// Decoded length in bytes.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// The number of chunks does not match the element count.
    #[error("{got} chunks given, but {elems} elements in chunks of {chunk_elems} make {expected}")]
    ChunkCount {
        /// Chunks given.
        got: usize,
        /// Chunks expected.
        expected: usize,
        /// Elements of the tensor.
        elems: usize,
        /// Elements per chunk.
        chunk_elems: usize,
    },
    /// A chunk failed (the one with the smallest index when several did).
    #[error("chunk {index}: {error}")]
    Chunk {
        /// Chunk index in the tensor.
        index: usize,
        /// What is wrong with it.
        error: CodecError,
    },
}
