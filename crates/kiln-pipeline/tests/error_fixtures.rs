//! Every file of `tests/fixtures/errors/` is a pipeline file that
//! [`kiln_pipeline::parse`] refuses; its snapshot (`snapshots/`) is the whole
//! error as shown to people, `file:line:column: message`, under the file's
//! text. Adding a case is adding a file (`cargo insta test --accept`, or
//! `INSTA_UPDATE=always cargo test --test error_fixtures`, writes its
//! snapshot; review it).

use kiln_pipeline::{FILE_NAME, PipelineError, parse};

#[test]
fn errors() {
    insta::glob!("fixtures/errors/*.yml", |path| {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let Err(err) = parse(FILE_NAME, &text) else {
            panic!("{path:?} parsed without an error");
        };
        // Every fixture's error has a location, and `Display` shows it.
        let (Some(line), Some(column)) = (err.line(), err.column()) else {
            panic!("{path:?}: error without a location: {err}");
        };
        let PipelineError::Invalid { message, .. } = &err else {
            panic!("{path:?}: unexpected error kind: {err:?}");
        };
        assert_eq!(
            err.to_string(),
            format!("{FILE_NAME}:{line}:{column}: {message}")
        );
        insta::with_settings!({ description => text.as_str(), omit_expression => true }, {
            insta::assert_snapshot!(err.to_string());
        });
    });
}
