//! Tests of every option with hand-built byte sequences: `GO`/`INFO`, `LIST`, `STARTTLS`,
//! structured replies, extended headers, meta contexts, unknown options.

use super::*;

#[test]
fn go_with_structured_replies_and_base_allocation() {
    let mut h = started(config());
    let r = cont(&mut h, &opt(8, b""));
    assert_eq!(r.len(), 1);
    assert!(r[0].is(OptionCode::StructuredReply, OptionReply::Ack) && r[0].data.is_empty());

    let r = cont(&mut h, &opt(10, &meta_data(b"disk", &[b"base:allocation"])));
    assert_eq!(r.len(), 2);
    assert!(r[0].is(OptionCode::SetMetaContext, OptionReply::MetaContext));
    assert_eq!(r[0].data, [&[0, 0, 0, 0][..], b"base:allocation"].concat());
    assert!(r[1].is(OptionCode::SetMetaContext, OptionReply::Ack));

    let mut bytes = opt(7, &go_data(b"disk", &[3, 1]));
    bytes.extend_from_slice(&[0x25, 0x60]);
    let (reply, n) = done(&mut h, &bytes);
    let r = replies(&reply);
    assert_eq!(r.len(), 4);
    assert!(r[..3]
        .iter()
        .all(|x| x.is(OptionCode::Go, OptionReply::Info)));
    assert_eq!(info_of(&r[0]), (InfoType::Name.code(), &b"disk"[..]));
    let sizes = [0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x10, 0, 0];
    assert_eq!(info_of(&r[1]), (InfoType::BlockSize.code(), &sizes[..]));
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_DF;
    let mut export = MIB.to_be_bytes().to_vec();
    export.extend_from_slice(&flags.bits().to_be_bytes());
    assert_eq!(info_of(&r[2]), (InfoType::Export.code(), &export[..]));
    assert!(r[3].is(OptionCode::Go, OptionReply::Ack));

    assert_eq!(n.export, 0);
    assert!(n.structured_replies && !n.extended_headers);
    assert!(n.block_sizes_acknowledged);
    assert_eq!(n.ended_with, Ending::Go);
    assert_eq!(n.transmission_flags, flags);
    let base = MetaContext {
        id: 0,
        index: 0,
        name: "base:allocation".into(),
    };
    assert_eq!(n.meta_contexts, vec![base]);
    assert_eq!(n.leftover, [0x25, 0x60]);
    assert_eq!(closed(&mut h, b"x"), HandshakeError::Ended);
}

#[test]
fn go_sends_export_and_block_size_even_unasked_and_description_on_request() {
    let mut h = started(config());
    let (reply, n) = done(&mut h, &opt(7, &go_data(b"disk", &[])));
    let r = replies(&reply);
    let kinds: Vec<u16> = r[..r.len() - 1].iter().map(|x| info_of(x).0).collect();
    assert_eq!(kinds, [InfoType::BlockSize.code(), InfoType::Export.code()]);
    assert!(!n.block_sizes_acknowledged);
    assert!(n.meta_contexts.is_empty());

    let mut h = started(config());
    let r = cont(&mut h, &opt(6, &go_data(b"disk", &[2, 2, 0, 77])));
    assert_eq!(
        info_of(&r[0]),
        (InfoType::Description.code(), &b"a test disk"[..])
    );
    assert!(r.last().unwrap().is(OptionCode::Info, OptionReply::Ack));
    // `other` has no description: nothing is sent for the request.
    let r = cont(&mut h, &opt(6, &go_data(b"other", &[2])));
    assert_eq!(r.len(), 3);
}

#[test]
fn info_then_go_give_the_same_information() {
    let mut h = started(config());
    cont(&mut h, &opt(11, b""));
    cont(
        &mut h,
        &opt(10, &meta_data(b"disk", &[b"qemu:allocation-depth"])),
    );
    let info = cont(&mut h, &opt(6, &go_data(b"disk", &[3])));
    let (reply, n) = done(&mut h, &opt(7, &go_data(b"disk", &[3])));
    let go = replies(&reply);
    let data = |r: &[Rep]| {
        r.iter()
            .map(|x| (x.kind, x.data.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(data(&info), data(&go));
    assert!(n.extended_headers && n.structured_replies);
    assert!(n
        .transmission_flags
        .contains(TransmissionFlags::BLOCK_STAT_PAYLOAD));
    assert_eq!(n.meta_contexts[0].name, "qemu:allocation-depth");
    assert_eq!(n.meta_contexts[0].id, 1);
}

#[test]
fn go_without_contexts_withholds_block_status_payload() {
    let mut h = started(config());
    cont(&mut h, &opt(11, b""));
    let (_, n) = done(&mut h, &opt(7, &go_data(b"disk", &[])));
    assert!(!n
        .transmission_flags
        .contains(TransmissionFlags::BLOCK_STAT_PAYLOAD));
    assert!(n.transmission_flags.contains(TransmissionFlags::SEND_DF));
}

#[test]
fn go_errors_keep_negotiating() {
    let mut h = started(config());
    let r = cont(&mut h, &opt(7, &go_data(b"missing", &[])));
    assert_eq!(r.len(), 1);
    assert!(r[0].is(OptionCode::Go, OptionReply::ErrUnknown));
    assert_eq!(r[0].data, b"export 'missing' not present");

    let long = vec![b'n'; 300];
    let r = cont(&mut h, &opt(7, &go_data(&long, &[])));
    let message = String::from_utf8(r[0].data.clone()).unwrap();
    assert!(
        message.ends_with("...' not present") && message.len() < 120,
        "{message}"
    );

    let mut bad = go_data(b"disk", &[1]);
    bad.push(0);
    let r = cont(&mut h, &opt(7, &bad));
    assert!(r[0].is(OptionCode::Go, OptionReply::ErrInvalid));
    let mut short = go_data(b"disk", &[]);
    short[3] = 200;
    assert!(cont(&mut h, &opt(7, &short))[0].is(OptionCode::Go, OptionReply::ErrInvalid));
    let r = cont(&mut h, &opt(7, &go_data(b"di\0sk", &[])));
    assert_eq!(r[0].data, b"name contains NUL");
    let r = cont(&mut h, &opt(6, &go_data(&[b'x'; 5000], &[])));
    assert_eq!(r[0].data, b"name too long");
    assert!(cont(&mut h, &opt(7, &[0, 0]))[0].is(OptionCode::Go, OptionReply::ErrInvalid));

    // The empty name is the default export.
    let (_, n) = done(&mut h, &opt(7, &go_data(b"", &[])));
    assert_eq!(n.export, 0);
}

#[test]
fn list_replies_one_server_per_export_then_ack() {
    let mut h = started(config());
    let r = cont(&mut h, &opt(3, b""));
    assert_eq!(r.len(), 3);
    assert!(r[0].is(OptionCode::List, OptionReply::Server));
    assert_eq!(
        r[0].data,
        [&[0, 0, 0, 4][..], b"disk", b"a test disk"].concat()
    );
    assert_eq!(r[1].data, [&[0, 0, 0, 5][..], b"other"].concat());
    assert!(r[2].is(OptionCode::List, OptionReply::Ack));
    let r = cont(&mut h, &opt(3, b"x"));
    assert_eq!(r.len(), 1);
    assert!(r[0].is(OptionCode::List, OptionReply::ErrInvalid));
}

#[test]
fn starttls_is_refused_by_policy() {
    let mut h = started(config());
    assert!(cont(&mut h, &opt(5, b""))[0].is(OptionCode::StartTls, OptionReply::ErrPolicy));
    assert!(cont(&mut h, &opt(5, b"x"))[0].is(OptionCode::StartTls, OptionReply::ErrInvalid));
}

#[test]
fn structured_and_extended_negotiation_rules() {
    let mut h = started(config());
    assert!(cont(&mut h, &opt(8, b"x"))[0].is(OptionCode::StructuredReply, OptionReply::ErrInvalid));
    assert!(cont(&mut h, &opt(8, b""))[0].is(OptionCode::StructuredReply, OptionReply::Ack));
    assert!(cont(&mut h, &opt(8, b""))[0].is(OptionCode::StructuredReply, OptionReply::ErrInvalid));
    assert!(
        cont(&mut h, &opt(11, b"x"))[0].is(OptionCode::ExtendedHeaders, OptionReply::ErrInvalid)
    );
    assert!(cont(&mut h, &opt(11, b""))[0].is(OptionCode::ExtendedHeaders, OptionReply::Ack));
    assert!(cont(&mut h, &opt(11, b""))[0].is(OptionCode::ExtendedHeaders, OptionReply::ErrInvalid));
    let r = cont(&mut h, &opt(8, b""));
    assert!(r[0].is(OptionCode::StructuredReply, OptionReply::ErrExtHeaderReqd));

    let mut config = server_config();
    config.set_structured_replies(false);
    config.set_extended_headers(false);
    let mut h = started(Arc::new(config));
    assert!(cont(&mut h, &opt(8, b""))[0].is(OptionCode::StructuredReply, OptionReply::ErrUnsup));
    assert!(cont(&mut h, &opt(11, b""))[0].is(OptionCode::ExtendedHeaders, OptionReply::ErrUnsup));
    let (_, n) = done(&mut h, &opt(7, &go_data(b"disk", &[])));
    assert!(!n.structured_replies && !n.extended_headers);
}

/// The context names of META_CONTEXT replies, with their ids.
fn contexts(r: &[Rep]) -> Vec<(u32, String)> {
    r.iter()
        .filter(|x| x.kind == OptionReply::MetaContext.code())
        .map(|x| {
            (
                u32_at(&x.data, 0).unwrap(),
                String::from_utf8(x.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn list_meta_context_queries() {
    let mut h = started(config());
    let list = |h: &mut Handshake, queries: &[&[u8]]| {
        let r = cont(h, &opt(9, &meta_data(b"disk", queries)));
        assert!(r
            .last()
            .unwrap()
            .is(OptionCode::ListMetaContext, OptionReply::Ack));
        let found = contexts(&r);
        assert!(found.iter().all(|(id, _)| *id == 0), "LIST ids are zero");
        found.into_iter().map(|(_, name)| name).collect::<Vec<_>>()
    };
    // Allowed before structured replies; no query lists everything.
    assert_eq!(list(&mut h, &[]), CONTEXTS);
    assert_eq!(list(&mut h, &[b"base:"]), ["base:allocation"]);
    assert_eq!(list(&mut h, &[b"qemu:"]), CONTEXTS[1..]);
    assert_eq!(list(&mut h, &[b"qemu:dirty-bitmap:"]), CONTEXTS[2..]);
    assert_eq!(
        list(&mut h, &[b"qemu:dirty-bitmap:b1", b"base:"]),
        [CONTEXTS[0], CONTEXTS[3]]
    );
    assert_eq!(
        list(&mut h, &[b"base:", b"base:allocation"]),
        ["base:allocation"]
    );
    assert!(list(&mut h, &[b"x-unknown:", b"nocolon", b"base:nothing"]).is_empty());
    assert!(
        list(&mut h, &[&[b'q'; 5000]]).is_empty(),
        "over-long queries are skipped"
    );
    let r = cont(&mut h, &opt(9, &meta_data(b"other", &[])));
    assert_eq!(r.len(), 1, "other offers no contexts");
}

#[test]
fn set_meta_context_selects_with_ids() {
    let mut h = started(config());
    let set = opt(10, &meta_data(b"disk", &[b"base:allocation"]));
    let r = cont(&mut h, &set);
    assert_eq!(r.len(), 1);
    assert!(
        r[0].is(OptionCode::SetMetaContext, OptionReply::ErrInvalid),
        "needs structured"
    );

    cont(&mut h, &opt(8, b""));
    let queries: [&[u8]; 4] = [
        b"qemu:dirty-bitmap:b1",
        b"bogus:x",
        b"base:allocation",
        b"base:",
    ];
    let r = cont(&mut h, &opt(10, &meta_data(b"disk", &queries)));
    assert_eq!(
        contexts(&r),
        [(0, CONTEXTS[0].into()), (3, CONTEXTS[3].into())]
    );
    assert!(r
        .last()
        .unwrap()
        .is(OptionCode::SetMetaContext, OptionReply::Ack));
    // Wildcards select nothing in SET.
    let r = cont(&mut h, &opt(10, &meta_data(b"disk", &[b"qemu:", b"base:"])));
    assert_eq!(r.len(), 1);
    let (_, n) = done(&mut h, &opt(7, &go_data(b"disk", &[])));
    assert!(n.meta_contexts.is_empty());
}

#[test]
fn set_meta_context_only_counts_for_the_same_export_and_failures_clear_it() {
    let mut h = started(config());
    cont(&mut h, &opt(8, b""));
    cont(&mut h, &opt(10, &meta_data(b"disk", &[b"base:allocation"])));
    let (_, n) = done(&mut h, &opt(7, &go_data(b"other", &[])));
    assert_eq!(n.export, 1);
    assert!(n.meta_contexts.is_empty());

    let mut h = started(config());
    cont(&mut h, &opt(8, b""));
    cont(&mut h, &opt(10, &meta_data(b"disk", &[b"base:allocation"])));
    let r = cont(
        &mut h,
        &opt(10, &meta_data(b"missing", &[b"base:allocation"])),
    );
    assert!(r[0].is(OptionCode::SetMetaContext, OptionReply::ErrUnknown));
    let (_, n) = done(&mut h, &opt(7, &go_data(b"", &[])));
    assert!(
        n.meta_contexts.is_empty(),
        "a failed SET replaces the selection"
    );
}

#[test]
fn malformed_meta_context_data_is_invalid() {
    let mut h = started(config());
    cont(&mut h, &opt(8, b""));
    let mut overflowing = meta_data(b"disk", &[b"base:allocation"]);
    let n = overflowing.len();
    overflowing[n - 16] = 0x7f; // the query length now points far past the data
    let mut trailing = meta_data(b"disk", &[]);
    trailing.push(1);
    let mut count = meta_data(b"disk", &[]);
    let n = count.len();
    count[n - 1] = 9; // nine queries in no bytes
    let cases = [
        overflowing,
        trailing,
        count,
        vec![0, 0, 0, 4, b'd'],
        vec![0, 0],
    ];
    for data in cases {
        for code in [9, 10] {
            let r = cont(&mut h, &opt(code, &data));
            assert_eq!(r.len(), 1, "{data:?}");
            assert_eq!(r[0].kind, OptionReply::ErrInvalid.code());
        }
    }
    let r = cont(&mut h, &opt(9, &meta_data(b"disk", &[b"base:\0"])));
    assert_eq!(r[0].kind, OptionReply::ErrInvalid.code());
}

#[test]
fn unknown_options_are_unsupported_and_negotiation_goes_on() {
    let mut h = started(config());
    for code in [0, 4, 12, 42, u32::MAX] {
        let r = cont(&mut h, &opt(code, b"some data"));
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].option, r[0].kind),
            (code, OptionReply::ErrUnsup.code())
        );
    }
    let (_, n) = done(&mut h, &opt(7, &go_data(b"disk", &[])));
    assert_eq!(n.export, 0);
}
