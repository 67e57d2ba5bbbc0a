-- member_keys is a look-up table distributed on its own key (an external id or an e-mail/phone
-- hash is unique among all members), not on member_id, so it cannot hold a foreign key to members
-- (Citus allows one only between co-located tables; libs/distribution.py checks it). Every writer
-- of a key writes or locks its member in the same transaction (create, update, merge, erase).
ALTER TABLE member_keys DROP CONSTRAINT member_keys_member_id_fkey;
