//! The model store: names, import and conversion, list/info/rm/verify/export
