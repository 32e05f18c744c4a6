//! The login phase: PDUs read until the session is logged in or refused, within a deadline.

use super::*;

/// A login must finish within this time.
pub(super) const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads one whole PDU of the login phase: header and data (no digests during login).
pub(super) async fn read_login_pdu(s: &TcpStream, rb: &mut RecvBuf) -> io::Result<(Bhs, Vec<u8>)> {
    rb.fill(s, BHS_LEN).await?;
    let bhs = Bhs::from_slice(rb.data()).ok_or(io::ErrorKind::InvalidData)?;
    let ahs = bhs.ahs_len();
    let dsl = bhs.data_len() as usize;
    if dsl > login::LOGIN_MAX_DSL as usize || ahs > MAX_AHS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "login PDU too large"));
    }
    rb.consume(BHS_LEN);
    rb.discard(s, ahs, |_| {}).await?;
    let mut data = vec![0u8; dsl];
    rb.read_segment(s, dsl, &mut data, false).await?;
    Ok((bhs, data))
}

pub(super) async fn login_phase(s: &Rc<TcpStream>, shared: &Arc<IscsiShared>, ctx: LoginContext, id: u64) -> Option<(LoggedIn, RecvBuf)> {
    let mut rb = RecvBuf::new(RECV_BUF_DEFAULT);
    let peer = ctx.peer;
    let mut login = Login::new(ctx.clone(), shared.initial_stat_sn());
    loop {
        let (bhs, data) = match read_login_pdu(s, &mut rb).await {
            Ok(x) => x,
            Err(e) => {
                log::debug!("iscsi: login from {peer} ended: {e}");
                return None;
            }
        };
        let step = {
            let reg = shared.registry();
            login.step(&reg, &bhs, &data)
        };
        match step {
            Step::Continue(resp) => {
                s.write_all(&resp).await.ok()?;
            }
            Step::Fail(resp) => {
                shared.counters.login_failures.fetch_add(1, Relaxed);
                log::info!("iscsi: login of {} from {peer} refused (status {:#04x}/{:#04x})", login.initiator().unwrap_or("?"), resp[36], resp[37]);
                let _ = s.write_all(&resp).await;
                return None;
            }
            Step::Complete(mut resp, li) => match shared.register_session(&li, id, &ctx).await {
                Ok(tsih) => {
                    resp[14..16].copy_from_slice(&tsih.to_be_bytes());
                    s.write_all(&resp).await.ok()?;
                    let name = li.node.as_ref().map(|n| n.name.as_str()).unwrap_or("discovery");
                    log::info!("iscsi: {} logged in to {name} from {peer} (tsih {tsih}, core {})", li.initiator, reactor::current_index());
                    return Some((*li, rb));
                }
                Err(st) => {
                    shared.counters.login_failures.fetch_add(1, Relaxed);
                    resp.truncate(BHS_LEN);
                    resp[1] &= !0x80;
                    resp[5..8].fill(0);
                    resp[36] = st.0;
                    resp[37] = st.1;
                    let _ = s.write_all(&resp).await;
                    return None;
                }
            },
        }
    }
}
