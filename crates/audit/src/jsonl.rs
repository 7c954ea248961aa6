//! JSON-lines export of records.
