//! The spend-record parser on arbitrary bytes: never panics, and whatever it accepts is valid
//! and what tally writes for it reads back as the same line (times are written to the
//! millisecond, so the first write may normalise; after that nothing changes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::spend::SpendRecord;

fuzz_target!(|line: &[u8]| {
    if let Ok(record) = SpendRecord::parse_line(line) {
        assert!(record.validate().is_ok());
        let written = record.to_line();
        assert_eq!(written.last(), Some(&b'\n'));
        let again = SpendRecord::parse_line(&written[..written.len() - 1])
            .expect("a record tally wrote must parse again");
        assert_eq!(again.to_line(), written);
        assert_eq!(again.transaction_id, record.transaction_id);
        assert_eq!(
            (again.input_tokens, again.output_tokens),
            (record.input_tokens, record.output_tokens)
        );
    }
});
