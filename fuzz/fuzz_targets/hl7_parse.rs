//! Coverage-guided fuzzing of the HL7 v2 ingestion path (HL7 v2.5.1 chapter 2 parsing, MLLP framing): no input may panic.
#![no_main]

use iomt_fhir::hl7v2::{ack, mllp, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Framing first, as on the wire: every decoded frame goes through the parser.
    let mut decoder = mllp::MllpDecoder::new(64 * 1024);
    let mut frames = decoder.push(data);
    frames.extend(decoder.finish());
    for frame in frames {
        if let mllp::Frame::Message(bytes) = frame {
            let _ = parse::parse(&bytes);
        }
    }
    // The raw input as a message, as a batch file and as a timestamp.
    match parse::parse(data) {
        Ok(msg) => {
            // Re-encoding must give back the same message.
            let again = parse::parse_str(&msg.encode());
            assert_eq!(again.as_ref(), Ok(&msg));
            let _ = ack::ack(Some(&msg), ack::AckCode::AA, None);
        }
        Err(e) => {
            let header = parse::parse_header(data);
            let nak = ack::ack(header.as_ref(), ack::AckCode::AE, Some(&ack::AckError::from(&e)));
            assert!(parse::parse_str(&nak).is_ok());
        }
    }
    let _ = parse::split_batch(data);
    let text = String::from_utf8_lossy(data);
    let _ = parse::parse_ts(&text);
    let _ = parse::parse_ts_with_default_offset(&text, "-0330");
});
